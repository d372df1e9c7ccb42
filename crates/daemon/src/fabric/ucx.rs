//! The `ucx` fabric: frames as UCX active messages (`vsocket-ucx`), one
//! UCX endpoint per host pair. With RDMA devices UCX carries them over
//! RC/DC verbs; without (as here) over its TCP transport. The same frames,
//! handshake, flow control and failure handling as [`super::tcp`] apply:
//! only how a frame crosses differs.
//!
//! One UCX worker serves the relay thread; its event fd sits in the
//! relay's epoll set. Before the relay sleeps the worker is armed, and if
//! UCX still has work (or has events queued) the relay polls again instead
//! (`before_sleep`).

use super::{Events, LinkEvent, LinkFailure, LinkId, Transport, TOKEN_POLL};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use vsocket_abi::fabric::{Frame, Origin, HEADER};
use vsocket_policy::FabricKind;
use vsocket_sys::Epoll;
use vsocket_ucx::{CloseMode, EpId, Event, Worker};

/// The relay's token for worker `key`'s event fd (key 0 listens; each
/// dialed link has a worker of its own).
fn token(key: u64) -> u64 {
    TOKEN_WORKERS + key
}
const TOKEN_WORKERS: u64 = 1 << 20;

/// UCX workers: one listening on this host's fabric address (it holds the
/// endpoints other hosts dial), and one per link this host dials, so that
/// whatever a failed connection leaves in UCX goes with its worker and a
/// later dial starts clean.
pub struct UcxTransport {
    /// This host's fabric address, where worker 0 listens.
    address: SocketAddr,
    /// Worker 0 listens (it may wait for the address's interface).
    workers: HashMap<u64, Worker>,
    next_worker: u64,
    links: HashMap<LinkId, (u64, EpId)>,
    by_ep: HashMap<(u64, EpId), LinkId>,
    next: LinkId,
    /// What happened outside `ready` (a dial's endpoint, a failed send),
    /// reported at the next `ready` or `flush`.
    later: Vec<Later>,
    /// Events taken from a worker to see whether it may sleep.
    stash: std::collections::VecDeque<(u64, Event)>,
    /// Workers armed and not used since: their event fd tells when they
    /// have work, so they need neither progress nor arming meanwhile.
    armed: HashSet<u64>,
}

enum Later {
    Up { link: LinkId, peer: SocketAddr },
    DialFailed { peer: SocketAddr, error: std::io::Error },
    Down { link: LinkId, why: LinkError },
}

/// Why a UCX link ended.
#[derive(Debug)]
pub enum LinkError {
    /// The other host sent a frame that does not decode whole.
    Malformed,
    /// UCX reported the endpoint failed.
    Endpoint(std::io::Error),
    /// A send on the endpoint failed.
    Send(std::io::Error),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Malformed => f.write_str("malformed frame"),
            LinkError::Endpoint(e) => write!(f, "UCX endpoint failed: {e}"),
            LinkError::Send(e) => write!(f, "UCX send: {e}"),
        }
    }
}

impl UcxTransport {
    pub fn new(address: SocketAddr, epoll: &Epoll) -> std::io::Result<UcxTransport> {
        let mut transport = UcxTransport {
            address,
            workers: HashMap::new(),
            next_worker: 1,
            links: HashMap::new(),
            by_ep: HashMap::new(),
            next: 16,
            later: Vec::new(),
            stash: std::collections::VecDeque::new(),
            armed: HashSet::new(),
        };
        match vsocket_sys::interface_running(address.ip())? {
            Some(true) => transport.listen(epoll)?,
            Some(false) => tracing::info!(%address, "fabric (ucx): waiting for the interface to come up"),
            None => {
                return Err(std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no interface holds the address"))
            }
        }
        Ok(transport)
    }

    /// Makes worker 0, listening on this host's fabric address. UCX learns
    /// the host's network devices when a worker is made and turns away
    /// connections that arrive on a device that came up later, so this
    /// waits until the address's interface runs.
    fn listen(&mut self, epoll: &Epoll) -> std::io::Result<()> {
        // vsocketd's main sets UCX_TCP_CM_REUSEADDR, so that a daemon
        // restarted at once gets its address back.
        let mut worker = Worker::new()?;
        worker.listen(self.address)?;
        // The fd is UCX's, open as long as the worker; the transport owns
        // the worker, and the relay's epoll set goes with the relay.
        epoll.add_raw(worker.event_fd(), libc::EPOLLIN as u32, token(0))?;
        self.workers.insert(0, worker);
        Ok(())
    }

    fn link_of(&mut self, key: u64, ep: EpId) -> LinkId {
        if let Some(&link) = self.by_ep.get(&(key, ep)) {
            return link;
        }
        let link = self.next;
        self.next += 1;
        self.links.insert(link, (key, ep));
        self.by_ep.insert((key, ep), link);
        link
    }

    fn report_later(&mut self, on: &mut dyn Events) {
        for event in std::mem::take(&mut self.later) {
            match event {
                Later::Up { link, peer } => on.event(LinkEvent::Up { link, peer, dialed: true }),
                Later::DialFailed { peer, error } => on.event(LinkEvent::DialFailed { peer, error }),
                Later::Down { link, why } => on.event(LinkEvent::Down { link, why: LinkFailure::Ucx(why) }),
            }
        }
    }

    fn next_event(&mut self) -> Option<(u64, Event)> {
        if let Some(e) = self.stash.pop_front() {
            return Some(e);
        }
        self.workers.iter_mut().find_map(|(&key, w)| w.poll_event().map(|e| (key, e)))
    }

    /// Progresses worker `key`, or (`None`) every worker not armed, then
    /// reports every queued event.
    fn drain_events(&mut self, key: Option<u64>, epoll: &Epoll, on: &mut dyn Events) {
        for (k, worker) in &mut self.workers {
            if key.map_or(!self.armed.contains(k), |key| key == *k) {
                self.armed.remove(k);
                worker.progress();
            }
        }
        self.report_events(epoll, on);
    }

    /// Reports the events workers have queued (without progressing them).
    fn report_events(&mut self, epoll: &Epoll, on: &mut dyn Events) {
        while let Some((key, event)) = self.next_event() {
            match event {
                Event::Accepted { ep, peer } => {
                    let link = self.link_of(key, ep);
                    // UCX may not tell the address: the Hello check then
                    // has only the name to go by.
                    let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                    on.event(LinkEvent::Up { link, peer, dialed: false });
                }
                Event::Frame { ep, frame } => {
                    let Some(&link) = self.by_ep.get(&(key, ep)) else { continue };
                    match Frame::decode(&frame) {
                        Ok(Some((f, used))) if used == frame.len() => on.event(LinkEvent::Frame(link, f)),
                        _ => {
                            self.close_link(link, epoll);
                            on.event(LinkEvent::Down { link, why: LinkFailure::Ucx(LinkError::Malformed) });
                        }
                    }
                }
                Event::Failed { ep, error } => {
                    let Some(link) = self.by_ep.get(&(key, ep)).copied() else { continue };
                    self.close_link(link, epoll);
                    on.event(LinkEvent::Down { link, why: LinkFailure::Ucx(LinkError::Endpoint(error)) });
                }
            }
        }
    }

    fn close_link(&mut self, link: LinkId, epoll: &Epoll) {
        let Some((key, ep)) = self.links.remove(&link) else { return };
        self.by_ep.remove(&(key, ep));
        self.stash.retain(|(k, _)| *k != key || key == 0);
        if key == 0 {
            if let Some(w) = self.workers.get_mut(&0) {
                let _ = w.close(ep, CloseMode::Force);
            }
        } else if let Some(mut w) = self.workers.remove(&key) {
            // A dialed link's worker goes with it.
            let _ = w.close(ep, CloseMode::Force);
            let _ = epoll.delete_raw(w.event_fd());
        }
    }

    /// Builds a frame for `link` in one of its worker's send buffers with
    /// `build` and sends it, unless `build` says no (`Err`, returned).
    fn send_built<T, E>(
        &mut self,
        link: LinkId,
        build: impl FnOnce(&mut Vec<u8>) -> Result<T, E>,
    ) -> Option<Result<T, E>> {
        let &(key, ep) = self.links.get(&link)?;
        let worker = self.workers.get_mut(&key)?;
        let mut frame = worker.buffer();
        let built = build(&mut frame);
        if built.is_ok() {
            // A send may leave the worker work to progress.
            self.armed.remove(&key);
            if let Err(e) = worker.send_buffer(ep, frame) {
                self.later.push(Later::Down { link, why: LinkError::Send(e) });
            }
        }
        Some(built)
    }
}

impl Transport for UcxTransport {
    fn dial(&mut self, address: SocketAddr, epoll: &Epoll) {
        let key = self.next_worker;
        self.next_worker += 1;
        let dialed = Worker::new().and_then(|mut w| {
            epoll.add_raw(w.event_fd(), libc::EPOLLIN as u32, token(key))?;
            match w.connect(address) {
                Ok(ep) => Ok((w, ep)),
                Err(e) => {
                    let _ = epoll.delete_raw(w.event_fd());
                    Err(e)
                }
            }
        });
        match dialed {
            Ok((worker, ep)) => {
                self.workers.insert(key, worker);
                let link = self.link_of(key, ep);
                self.later.push(Later::Up { link, peer: address });
            }
            Err(e) => self.later.push(Later::DialFailed { peer: address, error: e }),
        }
    }

    fn ready(&mut self, token: u64, _events: u32, epoll: &Epoll, on: &mut dyn Events) {
        let key = match token {
            TOKEN_POLL => None,
            t if t >= TOKEN_WORKERS => Some(t - TOKEN_WORKERS),
            _ => return,
        };
        self.report_later(on);
        self.drain_events(key, epoll, on);
        self.report_later(on);
    }

    fn send(&mut self, link: LinkId, frame: &Frame<'_>) {
        self.send_built(link, |bytes| {
            frame.encode(bytes);
            Ok::<_, std::convert::Infallible>(())
        });
    }

    fn send_encoded(&mut self, link: LinkId, bytes: &[u8]) {
        self.send_built(link, |frame| {
            frame.extend_from_slice(bytes);
            Ok::<_, std::convert::Infallible>(())
        });
    }

    fn send_ring(
        &mut self,
        link: LinkId,
        origin: Origin,
        id: u64,
        ring: &vsocket_ring::Consumer<'_>,
        len: usize,
    ) -> Result<bool, vsocket_ring::RingError> {
        // One copy out of the ring, straight after the header, into a send
        // buffer that UCX sends from.
        let read = |bytes: &mut Vec<u8>| {
            bytes.extend_from_slice(&Frame::data_header(origin, id, len));
            bytes.resize(HEADER + len, 0);
            match ring.read(&mut [&mut bytes[HEADER..]], false)? {
                (got, wake) if got == len => Ok(wake),
                _ => Err(vsocket_ring::RingError::Corrupt),
            }
        };
        // On a link gone meanwhile (its streams are being reset) the bytes
        // are dropped, as sent ones would be.
        self.send_built(link, read).unwrap_or_else(|| ring.discard(len).map(|(_, wake)| wake))
    }

    fn backlog(&self, _link: LinkId) -> usize {
        // `Worker::send` itself waits while too much is in flight.
        0
    }

    fn flush(&mut self, epoll: &Epoll, on: &mut dyn Events) {
        // Frames went to UCX as they were sent; what is left for it to do
        // makes `before_sleep` ask for a poll.
        self.report_later(on);
        self.report_events(epoll, on);
        self.report_later(on);
    }

    fn close(&mut self, link: LinkId, epoll: &Epoll) {
        self.close_link(link, epoll);
    }

    fn before_sleep(&mut self) -> bool {
        if !self.later.is_empty() || !self.stash.is_empty() {
            return false;
        }
        // Arm only with nothing queued (sends progress a worker and may
        // have queued events); busy means progress again first.
        if let Some(event) = self.next_event() {
            self.stash.push_back(event);
            return false;
        }
        for (&key, worker) in &mut self.workers {
            if !self.armed.contains(&key) {
                if !matches!(worker.arm(), Ok(true)) {
                    return false;
                }
                self.armed.insert(key);
            }
        }
        true
    }

    fn maintain(&mut self, epoll: &Epoll) {
        if self.workers.contains_key(&0) || !matches!(vsocket_sys::interface_running(self.address.ip()), Ok(Some(true)))
        {
            return;
        }
        match self.listen(epoll) {
            Ok(()) => tracing::info!(address = %self.address, "fabric (ucx): interface up, listening"),
            Err(e) => tracing::warn!(address = %self.address, error = %e, "fabric (ucx): cannot listen"),
        }
    }

    fn describe(&self) -> FabricKind {
        FabricKind::Ucx
    }
}
